"""Accuracy evaluation of engine pairs: CER/WER, CTC search, attention rescoring, the hackathon output check."""
