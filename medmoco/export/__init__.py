"""What leaves medmoco for other systems: DICOM Structured Reports of predictions (:mod:`.sr`) and
the model as a MONAI bundle."""
