"""Generate a synthetic scene from a checkout: the same as ``clm-synth`` (see ``--help``).

python tools/make_scene.py data/tiny --size tiny
python tools/make_scene.py data/metro --size metro --dense 150000000   # GPU, minutes
python tools/make_scene.py data/metro --dense 20000000 --dense-only    # another dense model
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from clm.cli.synth import main

if __name__ == "__main__":
    sys.exit(main())
