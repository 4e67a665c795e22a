"""The stream between the two halves of a split proxy: its codec, what fds stand for,
and the connections multiplexed on it."""
