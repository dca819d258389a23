"""``python -m sparselm ...`` (and ``torchrun --nproc-per-node N -m sparselm compress ...``): the command line."""
from .cli import app

app(prog_name="sparselm")
