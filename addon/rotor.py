"""Load with `mitmdump -s addon/rotor.py`: kmi-rotor's addon, from this checkout."""

import sys
from pathlib import Path

# The package beside this file wins over any installed copy, so a clone always runs its own code.
_here = str(Path(__file__).resolve().parent)
if sys.path[:1] != [_here]:
    sys.path.insert(0, _here)

from kmi_rotor.addon import Rotor  # noqa: E402

addons = [Rotor()]
