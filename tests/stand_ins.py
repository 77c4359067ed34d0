"""Stand-ins shared by tests that need a tokenizer's interface without the real tokenizer."""


class ChunkTable:
    """A stand-in LLaMA tokenizer that knows the ids of given text chunks (BOS included)."""

    bos_token_id = 1

    def __init__(self, table: dict[str, list[int]]):
        self.table = table

    def __call__(self, text: str) -> dict[str, list[int]]:
        return {"input_ids": self.table[text]}
