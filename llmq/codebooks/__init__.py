"""Vector codebooks: fixed lattice codebooks (E8P, llmq/codebooks/e8p.py) and their exact encoders. One file per
codebook family; methods (llmq/methods/) and packed formats (llmq/formats/) build on them."""
