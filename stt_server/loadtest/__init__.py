"""Client-side tools: the streaming client (:mod:`.client`, :mod:`.events`), the load tester
``stt-loadtest`` (:mod:`.cli` over :mod:`.users`, :mod:`.stats`, :mod:`.scrape`,
:mod:`.display`, :mod:`.plot`), WER scoring (:mod:`.wer`) and the shipped speech (:mod:`.clips`).
"""
