"""Domain: what the broker does (store, hand out, refresh, disconnect), owning transactions."""
