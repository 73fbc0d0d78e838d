"""Delivery over SMTP and LMTP: sessions, connection pools, static and MX relays."""
