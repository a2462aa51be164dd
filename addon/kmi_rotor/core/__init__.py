"""Pure decisions: no I/O, no mitmproxy, the clock passed in."""
