"""egress: the default-deny network controller (nftables table ``inet nullbox``) and its per-agent DNS proxies."""
