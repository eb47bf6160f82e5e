"""Baseline for scenario 5 (join storm) only: naive_server.py plus ONE line,
a "joined the chat" broadcast, i.e. what a tutorial user who wants join
announcements would most likely add.  The tutorial itself announces leaves
but not joins, so without this line the baseline would send no presence at
all and the comparison would be meaningless.
"""
from fastapi import FastAPI, WebSocket, WebSocketDisconnect

from naive_server import ConnectionManager

app = FastAPI()
manager = ConnectionManager()


@app.websocket("/ws/{client_id}")
async def websocket_endpoint(websocket: WebSocket, client_id: int | str):
    await manager.connect(websocket)
    await manager.broadcast(f"Client #{client_id} joined the chat")  # the added line
    try:
        while True:
            data = await websocket.receive_text()
            await manager.send_personal_message(f"You wrote: {data}", websocket)
            await manager.broadcast(f"Client #{client_id} says: {data}")
    except WebSocketDisconnect:
        manager.disconnect(websocket)
        await manager.broadcast(f"Client #{client_id} left the chat")
