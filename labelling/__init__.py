"""One labelling app for every expert task: the loopback page server, the versioned label and
document stores, and the Label Studio / Argilla round trip that the pilot page
(``qualification``) and the expert pages (``experts``: seeds, audit, re-annotation) share."""
