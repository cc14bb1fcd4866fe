"""pdserve's protocol buffers, by API version."""
