"""The names kmi-rotor goes by inside mitmproxy, each defined once.

Its options share the prefix `rotor_` (`--set rotor_config=...`), its commands `rotor.`
(`rotor.status`); what it attaches to a flow lives under `flow.metadata["kmi_rotor"]` (saved
flows keep it, so the key's label, pool and outcome travel with them).
"""

from __future__ import annotations

OPTION_PREFIX = "rotor_"
"""Of every mitmproxy option kmi-rotor adds."""
CONFIG_OPTION = f"{OPTION_PREFIX}config"
ALLOW_REMOTE_OPTION = f"{OPTION_PREFIX}allow_remote"
KEY_HEADER_OPTION = f"{OPTION_PREFIX}key_header"

META = "kmi_rotor"
"""The key of kmi-rotor's data in `flow.metadata`."""
