"""Client budgets (token buckets in tokens and requests) and the usage record of every answered request.

`store` is the interface a budget store implements (memory here, Redis and SQLite beside it), `bucket`
the pure bucket math, `metering` what a request is estimated at and what its answer says it used, and
`core` the facade the request path calls.
"""
