"""nullctl: the operator's command line for NullBox."""
