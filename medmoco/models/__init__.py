"""Networks: MONAI backbones by name, MoCo, split BatchNorm, backbone export. No MLflow here."""
from .backbones import BACKBONES, create_backbone
from .classifier import Classifier, build_classifier, load_classifier, save_classifier
from .export import export_backbone, load_backbone_state
from .moco import MOCO_VERSIONS, MoCo, build_moco, check_queue_batch
from .split_bn import SplitBatchNorm2d, convert_split_bn

__all__ = ["BACKBONES", "create_backbone", "MoCo", "build_moco", "check_queue_batch", "MOCO_VERSIONS",
           "SplitBatchNorm2d", "convert_split_bn", "Classifier", "build_classifier", "load_classifier",
           "save_classifier", "export_backbone", "load_backbone_state"]
