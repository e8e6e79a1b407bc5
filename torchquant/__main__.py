import sys

from torchquant.cli import main

sys.exit(main())
