"""The example's pre- and post-processing steps (see serve.yaml).

Tokenize turns each text into a fixed-length row of word ids, as the model
wants them; Labels turns each row of the model's scores into a class name.
Both get the whole batch at once and answer one row per row.
"""

import numpy as np

from flywheel.protocol.errors import InvalidInputError


class Tokenize:
    """text (BYTES [batch]) -> ids (INT64 [batch, length]); unknown words
    and padding are id 0."""

    def load(self, artifacts, config):
        # the vocabulary is a file of the model's folder: one word a line, id = line number + 1
        with open(artifacts[config["kwargs"]["vocab"]], encoding="utf-8") as f:
            self.ids = {word.strip(): i + 1 for i, word in enumerate(f) if word.strip()}
        self.length = int(config["kwargs"]["length"])

    def process(self, inputs):
        texts = inputs["text"]
        ids = np.zeros((len(texts), self.length), np.int64)
        for row, raw in enumerate(texts):
            try:
                words = raw.decode("utf-8").lower().split()
            except UnicodeDecodeError:
                # the caller's mistake: a 400 naming the input, not a 500
                raise InvalidInputError(f"input 'text'[{row}] is not UTF-8 text") from None
            found = [self.ids.get(w.strip(".,!?"), 0) for w in words][: self.length]
            ids[row, : len(found)] = found
        return {"ids": ids}


class Labels:
    """scores (FP32 [batch, classes]) -> label (BYTES [batch])."""

    def load(self, artifacts, config):
        self.names = np.array([n.encode() for n in config["kwargs"]["labels"]], dtype=object)

    def process(self, inputs):
        return {"label": self.names[inputs["scores"].argmax(axis=1)]}
