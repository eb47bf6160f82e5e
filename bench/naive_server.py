"""Baseline: the FastAPI documentation's WebSocket tutorial ("Handling
disconnections and multiple clients"), kept as close to the docs as possible.

Differences from the docs, both irrelevant to the measurements:
  * the tutorial's HTML test page at GET / is left out;
  * client_id is `int | str` instead of `int`, so the load generator's
    publisher can be called "pub" (it appears in "Client #pub says: ...").

Serve exactly as a tutorial user would:
    uvicorn naive_server:app --host 127.0.0.1 --port 8000 --log-level warning
"""
from fastapi import FastAPI, WebSocket, WebSocketDisconnect

app = FastAPI()


class ConnectionManager:
    def __init__(self):
        self.active_connections: list[WebSocket] = []

    async def connect(self, websocket: WebSocket):
        await websocket.accept()
        self.active_connections.append(websocket)

    def disconnect(self, websocket: WebSocket):
        self.active_connections.remove(websocket)

    async def send_personal_message(self, message: str, websocket: WebSocket):
        await websocket.send_text(message)

    async def broadcast(self, message: str):
        for connection in self.active_connections:
            await connection.send_text(message)


manager = ConnectionManager()


@app.websocket("/ws/{client_id}")
async def websocket_endpoint(websocket: WebSocket, client_id: int | str):
    await manager.connect(websocket)
    try:
        while True:
            data = await websocket.receive_text()
            await manager.send_personal_message(f"You wrote: {data}", websocket)
            await manager.broadcast(f"Client #{client_id} says: {data}")
    except WebSocketDisconnect:
        manager.disconnect(websocket)
        await manager.broadcast(f"Client #{client_id} left the chat")
