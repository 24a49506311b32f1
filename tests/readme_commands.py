"""What tests/test_readme.py does with each command line of the README's ```bash blocks.

Each README command (continuation lines joined, the trailing comment removed) appears here once,
in README order, with one of:

* ``run(command)``: the command the test runs, on small data in a scratch folder, in this order
  (each one reads what the ones before wrote). It must be the README's command with the same
  subcommand and the same options; only values may differ (fewer patients, a smaller size, the
  scratch folder's paths, a short run through ``--set``, which adds options).
* ``covered(test)``: another test runs it for real (named ``file::function``; checked to exist).
* ``not_run(reason)``: what it needs is not on a CI machine (GPUs, a lab's server), said why.

A README command missing here, or an entry whose command is no longer in the README, fails the
test: change the README and this file together.
"""


def run(command: str) -> tuple:
    return ("run", command)


def covered(test: str) -> tuple:
    return ("covered", test)


def not_run(reason: str) -> tuple:
    return ("not run", reason)


SHORT_PRETRAIN = "--set epochs=1 --set max_iters_per_epoch=2 --set knn_every=0 --set workers=0"
SHORT_FINETUNE = "--set epochs=1 --set max_iters_per_epoch=2 --set workers=0"

COMMANDS = [
    ("make demo", not_run("about 2 minutes on 2 cores: run it by hand; its stages are the commands below, run here")),
    ("make test", not_run("it is this test suite")),
    ("medmoco synth --out data/synth --patients 20 --seed 0",
     run("medmoco synth --out data/synth --patients 6 --seed 0")),
    ("medmoco synth --out data/synth-zip --patients 20 --zip", run("medmoco synth --out data/synth-zip --patients 12 --zip --rows 128")),
    ("medmoco preprocess --input rsna-intracranial-hemorrhage-detection.zip --labels stage_2_train.csv --out cache/ "
     "--size 256 --windows brain,subdural,bone",
     run("medmoco preprocess --input data/synth-zip/rsna-intracranial-hemorrhage-detection.zip "
         "--labels data/synth-zip/stage_2_train.csv "
         "--out cache/ --size 64 --windows brain,subdural,bone")),
    ("medmoco split --cache cache/ --fractions unsupervised=0.4,train=0.3,val=0.15,test=0.15",
     run("medmoco split --cache cache/ --fractions unsupervised=0.4,train=0.3,val=0.15,test=0.15")),
    ("medmoco pretrain --config configs/pretrain/cpu_demo.yaml --cache demo-run/cache --run-dir runs/pretrain-cpu",
     run(f"medmoco pretrain --config configs/pretrain/cpu_demo.yaml --cache demo-run/cache --run-dir runs/pretrain-cpu "
         f"{SHORT_PRETRAIN}")),
    ("torchrun --nproc_per_node=4 -m medmoco pretrain --config configs/pretrain/moco_v2_resnet50_a100.yaml --cache CACHE",
     not_run("4 GPUs; torchrun with 2 gloo processes: tests/test_distributed.py")),
    ("sbatch --export=ALL,MEDMOCO_CONFIG=configs/pretrain/moco_v2_resnet50_a100.yaml,MEDMOCO_CACHE=CACHE "
     "slurm/train_gpu.sbatch", not_run("GPU nodes; the CPU template runs under a real SLURM in tests/test_slurm.py")),
    ("medmoco pretrain --config ... --run-dir runs/r50 --resume auto",
     covered("tests/test_pretrain.py::test_killed_twice_and_resumed_run_logs_the_same_losses_and_weights")),
    ("sbatch --export=ALL,MEDMOCO_CONFIG=configs/pretrain/moco_v2_resnet50_a100.yaml,MEDMOCO_CACHE=cache "
     "slurm/train_gpu.sbatch", not_run("GPU nodes; the CPU template runs under a real SLURM in tests/test_slurm.py")),
    ("sbatch --ntasks=4 --cpus-per-task=8 --export=ALL,MEDMOCO_CONFIG=configs/pretrain/cpu_demo.yaml,MEDMOCO_CACHE=cache "
     "slurm/train_cpu.sbatch",
     covered("tests/test_slurm.py::test_cpu_template_trains_two_ranks_and_a_requeue_resumes_into_the_same_mlflow_run")),
    ("jid=$(sbatch --parsable --array=0-7 --cpus-per-task=8 --export=ALL,MEDMOCO_INPUT=rsna.zip,"
     "MEDMOCO_LABELS=stage_2_train.csv,MEDMOCO_PARTS=cache-parts slurm/preprocess_array.sbatch)",
     covered("tests/test_slurm.py::test_preprocessing_array_and_dependent_merge_equal_one_run")),
    ("sbatch --dependency=afterok:$jid --export=ALL,MEDMOCO_PARTS=cache-parts,MEDMOCO_CACHE=cache "
     "slurm/preprocess_merge.sbatch",
     covered("tests/test_slurm.py::test_preprocessing_array_and_dependent_merge_equal_one_run")),
    ("python benchmarks/pretrain.py --e2e --device cuda --arch resnet50 --size 224 --batch 128 --iters 50 --warmup 10 "
     "--workers 2", not_run("a CUDA GPU; the CPU form runs in tests/test_benchmarks.py")),
    ("medmoco finetune --config configs/finetune/cpu_demo.yaml --mode finetune --pretrained "
     "demo-run/pretrain/backbone.pt --run-dir runs/ft-moco",
     run(f"medmoco finetune --config configs/finetune/cpu_demo.yaml --mode finetune --pretrained "
         f"runs/pretrain-cpu/backbone.pt --run-dir runs/ft-moco {SHORT_FINETUNE}")),
    ("medmoco finetune --config ... --mode linear --pretrained runs:/<pretraining run id> --run-dir runs/ft-linear",
     run(f"medmoco finetune --config configs/finetune/cpu_demo.yaml --mode linear --pretrained runs:/$PRETRAIN_RUN "
         f"--run-dir runs/ft-linear {SHORT_FINETUNE}")),
    ("medmoco finetune --config ... --mode scratch --pretrained demo-run/pretrain/backbone.pt --run-dir runs/ft-scratch",
     run(f"medmoco finetune --config configs/finetune/cpu_demo.yaml --mode scratch --pretrained "
         f"runs/pretrain-cpu/backbone.pt --run-dir runs/ft-scratch {SHORT_FINETUNE}")),
    ("medmoco series --config configs/series/cpu_demo.yaml --encoder runs/ft-moco/model.pt --cache demo-run/cache "
     "--run-dir runs/series",
     run("medmoco series --config configs/series/cpu_demo.yaml --encoder runs/ft-moco/model.pt --cache demo-run/cache "
         "--run-dir runs/series --set epochs=2 --set bootstrap.replicates=50")),
    ("medmoco evaluate --model runs/ft-moco/model.pt --cache demo-run/cache --split test --out eval/",
     run("medmoco evaluate --model runs/ft-moco/model.pt --cache demo-run/cache --split test --out eval/ "
         "--replicates 50")),
    ("export MLFLOW_TRACKING_URI=sqlite:///demo-run/mlflow.db", run("export MLFLOW_TRACKING_URI=sqlite:///demo-run/mlflow.db")),
    ("medmoco predict --model models:/rsna-ich-moco@candidate --input DICOM_DIR_OR_ZIP --out submission.csv",
     run("medmoco predict --model models:/rsna-ich-moco@candidate --input data/synth-zip/rsna-intracranial-hemorrhage-detection.zip "
         "--out submission.csv")),
    ("medmoco predict --model runs/series/model.pt --input DICOM_DIR_OR_ZIP --out slices.csv --series-out series.csv",
     run("medmoco predict --model runs/series/model.pt --input data/synth-zip/rsna-intracranial-hemorrhage-detection.zip "
         "--out slices.csv --series-out series.csv")),
    ("medmoco select --model runs:/<finetune run id> --cache demo-run/cache --n 12800 --strategy uncertainty "
     "--by-series --out ids.csv",
     run("medmoco select --model runs:/$FINETUNE_RUN --cache demo-run/cache --n 12800 --strategy uncertainty "
         "--by-series --out ids.csv")),
    ("medmoco finetune --config ... --extra-labels newly_labeled.csv",
     covered("tests/test_finetune.py::test_extra_labels_are_added_and_recorded")),
    ("medmoco register --run <finetune run id> --name rsna-ich-moco",
     run("medmoco register --run $FINETUNE_RUN --name rsna-ich-moco")),
    ("medmoco review --name rsna-ich-moco", run("medmoco review --name rsna-ich-moco")),
    ("medmoco review --name rsna-ich-moco --compare 3 --against champion --cache CACHE --out review/v3",
     covered("tests/test_review.py::test_compare_scores_both_models_on_the_same_images")),
    ("medmoco review --name rsna-ich-moco --compare 3 --against 2 --input DICOM_DIR --labels labels.csv --out review/raw",
     covered("tests/test_review.py::test_compare_on_raw_dicoms_runs_each_models_own_preprocessing")),
    ("medmoco review --name rsna-ich-moco --promote 3 --cache CACHE",
     run("medmoco review --name rsna-ich-moco --promote 1 --cache demo-run/cache")),
    ('medmoco review --name rsna-ich-moco --promote 3 --cache CACHE --force --reason "reader study, site B"',
     covered("tests/test_review.py::test_promotion_needs_non_inferiority_and_records_what_it_rested_on")),
    ("mlflow models serve -m models:/rsna-ich-moco@champion --env-manager local -p 5001",
     covered("tests/test_registry.py::test_against_a_real_mlflow_server_and_models_serve")),
    ("printf '{\"dataframe_split\": {\"columns\": [\"dicom\"], \"data\": [[\"%s\"]]}}' \"$(base64 -w0 slice.dcm)\" "
     "> payload.json",
     covered("tests/test_registry.py::test_against_a_real_mlflow_server_and_models_serve")),
    ("curl -s localhost:5001/invocations -H 'Content-Type: application/json' -d @payload.json",
     covered("tests/test_registry.py::test_against_a_real_mlflow_server_and_models_serve")),
    ("medmoco review --name rsna-ich-moco --plan --cache CACHE --margin 0.005",
     covered("tests/test_review.py::test_promotion_decides_on_the_release_split_counts_decisions_and_plans_the_margin")),
    ("cat > basic_auth.ini <<'INI'", covered("tests/test_registry_access.py::server")),
    ("export MLFLOW_AUTH_CONFIG_PATH=basic_auth.ini MLFLOW_AUTH_ADMIN_PASSWORD=... MLFLOW_FLASK_SERVER_SECRET_KEY=...",
     covered("tests/test_registry_access.py::server")),
    ("mlflow server --app-name medmoco-auth --backend-store-uri postgresql://... --artifacts-destination s3://... "
     "--host 0.0.0.0", covered("tests/test_registry_access.py::server")),
    ("export MLFLOW_TRACKING_USERNAME=admin MLFLOW_TRACKING_PASSWORD=... MLFLOW_TRACKING_URI=http://mlflow.lab:5000",
     covered("tests/test_registry_access.py::test_a_hostile_lab_member_meets_a_refusal_at_every_door")),
    ("python -c \"from mlflow.server import get_app_client as c; c('medmoco-auth', tracking_uri='$MLFLOW_TRACKING_URI')"
     ".create_user('alice', 'a-password')\"",
     covered("tests/test_registry_access.py::test_a_hostile_lab_member_meets_a_refusal_at_every_door")),
    ("medmoco registry roles --name rsna-ich-moco --trainers alice,bob --release-managers carol --reviewers dave "
     "--margin 0.005", covered("tests/test_registry_access.py::test_a_hostile_lab_member_meets_a_refusal_at_every_door")),
    ("medmoco registry roles --name rsna-ich-moco --reviewers bob",
     covered("tests/test_registry_access.py::test_a_hostile_lab_member_meets_a_refusal_at_every_door")),
    ("medmoco registry roles --name rsna-ich-moco --remove dave",
     covered("tests/test_registry_access.py::test_a_hostile_lab_member_meets_a_refusal_at_every_door")),
    ("python -c \"from mlflow.server import get_app_client as c; c('medmoco-auth', tracking_uri='$MLFLOW_TRACKING_URI')"
     ".update_user_password('alice', 'new-password')\"",
     not_run("an admin's password change on the lab server; MLflow's own call, not medmoco's")),
    # section 6: from the registry to the hospital
    ("medmoco export bundle --model models:/rsna-ich-moco@champion --out bundle --tracking-uri sqlite:///mlflow.db",
     covered("tests/test_bundle.py::test_a_released_model_carries_its_verified_promotion_record")),
    ("python -m monai.bundle verify_metadata --meta_file bundle/configs/metadata.json "
     "--filepath bundle/configs/metadata_schema.json",
     covered("tests/test_bundle.py::test_monai_verifies_metadata_offline_and_the_network_in_and_out")),
    ("python -m monai.bundle verify_net_in_out network_def --meta_file bundle/configs/metadata.json "
     "--config_file bundle/configs/inference.json",
     covered("tests/test_bundle.py::test_monai_verifies_metadata_offline_and_the_network_in_and_out")),
    ("python -m monai.bundle run --config_file bundle/configs/inference.json --bundle_root bundle "
     "--dataset_dir series/ --output_dir out",
     covered("tests/test_bundle.py::test_the_series_bundle_run_by_monai_gives_medmoco_predict_on_a_real_series")),
    ("medmoco predict --model models:/rsna-ich-moco@champion --input study.zip --out slices.csv "
     "--series-out series.csv --sr reports/",
     covered("tests/test_sr.py::test_one_valid_sr_per_series_of_a_synthetic_zip")),
    ("dciodvfy reports/*.dcm", covered("tests/test_sr.py::test_one_valid_sr_per_series_of_a_synthetic_zip")),
    ("medmoco preprocess --input \"dicomweb+http://pacs:8042/dicom-web\" --out cache --size 256",
     covered("tests/test_dicomweb.py::test_preprocess_from_dicomweb_equals_files")),
    ("medmoco predict --model model.pt --input "
     "\"dicomweb+http://pacs:8042/dicom-web?StudyInstanceUID=1.2.840.113619.2.55.3.1234\" --out predictions.csv "
     "--series-out series.csv --sr reports/ --stow http://pacs:8042/dicom-web",
     covered("tests/test_dicomweb.py::test_stow_stores_the_srs_of_a_prediction_from_dicomweb")),
]
