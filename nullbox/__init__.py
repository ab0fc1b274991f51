"""Pieces every NullBox component shares: the wire protocol, logging, readiness notification.

Kept in one package so that no daemon grows its own copy of framing or error handling.
"""
