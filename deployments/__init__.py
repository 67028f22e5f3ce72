from .logs import forward_library_logs

forward_library_logs()  # every replica imports this package: library logs (load progress) reach its Serve log
