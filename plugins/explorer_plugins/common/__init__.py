"""Shared helpers of the built-in method plugins (not a plugin itself: no manifest)."""
