"""What every `meterline` command is built from, by the family it belongs to.

- API clients (`api.py`): `accounts`, `keys`, `usage`, `report`, `tasks`, `quote`, `prices
  export` and `invoices finalize|void|show|unpriced` speak to a running Meterline over HTTP,
  with `--url` and `--token`, and obey the API's rules.
- Direct to the database (`database.py`): `db`, `prices import` and `invoices
  generate|rollup` (bulk work the API has no endpoint for) open the configured (or embedded)
  Postgres themselves, for the operator on the server's machine.

`output.py` prints for both: tables, records, JSON, one-line errors.
"""
