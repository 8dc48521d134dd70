"""Write ``docker/requirements.txt``, the exact versions the container images install (:mod:`wsi_fl.deploy.image_lock`).

    python scripts/lock_image_requirements.py            # rewrite the lock (pip resolves, installs nothing)
    python scripts/lock_image_requirements.py --check    # exit 1 if setup.cfg's pins and the lock disagree
"""

from __future__ import annotations

import sys

from wsi_fl.deploy.image_lock import main

if __name__ == "__main__":
    sys.exit(main())
