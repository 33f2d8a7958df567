"""Layer 7: choosing formats per weight by measurement (`auto`): losses, bytes, latencies."""
