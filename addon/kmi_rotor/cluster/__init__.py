"""Several kmi-rotor processes sharing one pool through Redis (the `[cluster]` table)."""
