"""Attention flow (Abnar & Zuidema, ACL 2020): max-flow through the layered attention graph."""
