"""Outbound network: the egress policy, TLS client contexts, webhook delivery."""
