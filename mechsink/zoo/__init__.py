"""Bundled models: the trained toy LVLM and the builders behind the test zoo."""
