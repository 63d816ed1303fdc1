"""The deployment kit: credentials for a SuperLink with TLS and authenticated SuperNodes (see deploy/README.md)."""
