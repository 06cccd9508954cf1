"""Client-side tools: a streaming client, WER scoring, and (later) the load tester."""
