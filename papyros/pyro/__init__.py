"""The distributed backend, over Pyro5: a dispatcher process, remote workers, clients.

Nothing here is imported by ``import papyros``; Pyro5 is needed only here.
"""
