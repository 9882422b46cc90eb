import sys

from ponderlm.cli.main import main

sys.exit(main())
