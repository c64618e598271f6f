"""The web console at `/console`: server-rendered pages over the billing API's services.

Every page calls the same service functions as the matching `/billing/...` endpoint, with the
`Principal` of the signed-in browser, so the console can show nothing the API would not.
"""
