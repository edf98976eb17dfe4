"""Cost planning: measure a trainer's per-step cost and project a whole run (`diffalign plan`)."""
