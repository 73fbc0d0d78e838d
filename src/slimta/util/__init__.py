"""Utilities shared by edges, queues and relays."""
