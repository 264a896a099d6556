from twisted.application.service import ServiceMaker

cachesvc = ServiceMaker(
    "cachesvc",
    "cachesvc.tap",
    "Keep web page caches fresh: purge daemon, recache scheduler and HTTP API.",
    "cachesvc",
)
