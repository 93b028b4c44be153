"""`python -m tokenratio.cli ...` (what `accelerate launch -m` and `torchrun -m` run)."""

from tokenratio.cli import main

raise SystemExit(main())
