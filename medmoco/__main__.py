"""`python -m medmoco ...` (also what `torchrun -m medmoco pretrain ...` runs)."""
import sys

from pipelines.cli import main

sys.exit(main())
