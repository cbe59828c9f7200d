"""Gate: judges every result between infer and encode (anatomy, the model's confidence), and decides from the
verdict which destinations may receive it. Nothing is encoded or sent before the gate has spoken."""
