"""A faithful Python port of the original PHP design, the benchmark's baseline.

The original (``/work/shared/seed/original-design.txt``) is a Swoole WebSocket
server that LPUSHes each record onto ``device:log:list`` and a ThinkPHP
command that BRPOPs them one at a time into Monolog daily files.  The port
keeps its shape exactly (one Redis round trip per command, per frame; one file
append per record) and runs on the same interpreter, event loop and machine as
fleetlog, so that the comparison measures the design, not PHP against Python.
"""
