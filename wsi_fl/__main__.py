import sys

from wsi_fl.cli.main import main

sys.exit(main())
