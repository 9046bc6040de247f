"""Ask the example's sentiment model for the labels of some texts, with
tritonclient over V2 HTTP: ``python client.py "a great film" "so boring"``."""

import argparse

import numpy as np
import tritonclient.http as httpclient


def classify(url: str, texts: list[str]) -> list[str]:
    """The label the served model gives each text."""
    client = httpclient.InferenceServerClient(url=url)
    try:
        text = httpclient.InferInput("text", [len(texts)], "BYTES")
        text.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=object))
        result = client.infer("sentiment", [text])
        return [label.decode() for label in result.as_numpy("label")]
    finally:
        client.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("texts", nargs="+")
    parser.add_argument("--url", default="127.0.0.1:8000", help="the server's HTTP host:port")
    args = parser.parse_args()
    for t, label in zip(args.texts, classify(args.url, args.texts)):
        print(f"{label:>8}  {t}")
