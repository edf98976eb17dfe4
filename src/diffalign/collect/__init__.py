"""Collecting human preferences in a browser: a queue of image pairs, per-rater tokens, and a FastAPI
server whose every vote lands in the preference store (see docs/collect.md).

Modules: `models` (the queue's tables), `storage` (opening the store, one write transaction), `tokens`,
`queue` (claim a pair, record a vote), `tasks` (sample a model into pairs, active selection), `report`
(counts, agreement), `limits` (body size, rate limit), `app` (the routes and pages).
"""
