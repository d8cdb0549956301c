"""Small shared helpers, one copy each: atomic writes, hashing and JSON-lines IO (`io`), provenance of
runs (`provenance`), matplotlib figures (`plot`). Everything in kvshift that needs one of these imports
it from here."""
