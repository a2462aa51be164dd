"""kmi-rotor: one endpoint in front of a pool of LLM API keys, as a mitmproxy addon."""

__version__ = "0.1.0"
