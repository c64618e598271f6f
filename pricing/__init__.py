"""Pure pricing: money, price tables, costs, invoices, quotes. No I/O, no ORM, no web."""
