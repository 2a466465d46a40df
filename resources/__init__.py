"""The flashsale app. flashsale.create_app() wires these together.

The resources, one module per noun (thin: parse, run a statement, answer):
    accounts   registering, logging in, GET /api/me
    sales      flash sales: the current one, the list, one by id, creating one
    orders     the purchase, and one's own orders
    health     GET /health
    openapi    GET /openapi.json, the API as an OpenAPI document
    page       the shopper's page (index.html and static/)

The SQL:
    sql        every statement the app runs, and the executors that run them
    (schema.sql, beside flashsale.py, holds the tables and their constraints)

The plumbing, each module named for what it does:
    errors       every error code with its status and message, and the
                 mapping of exceptions to answers
    parsing      reading request bodies and path ids strictly
    credentials  passwords, tokens, and the middleware that verifies the
                 caller's token once per request
    ratelimit    the per-address and per-user token buckets
    middleware   security headers, the access log, static-file methods
    logwriter    the log lines, written to stderr in batches by one thread
    cache        the answers everyone polls, shared for a moment
    database     the connection pool, and applying schema.sql
    embedded     the development PostgreSQL (only without DATABASE_URL)
    serving      waitress as `flashsale serve` runs it, with a graceful stop
"""
