"""Who a request is (SPEC section 11): verified tokens, API keys, keys read from a body."""
