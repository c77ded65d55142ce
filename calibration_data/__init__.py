"""Data set generators and cached data: the synthetic speech corpus (text, audio, fbank features)."""
